"""scope-mega: Megatron-based RL from verifiable rewards with SCOPE step-wise rectification."""

import warnings

# Megatron-Core announces each Apex / Transformer Engine fallback at import time, once per module and
# process. Without those packages (CPU machines) the fallbacks are expected; keep the logs readable.
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine|apex).*not installed.*")
warnings.filterwarnings("ignore", message=r".*Transformer Engine and Apex are not installed.*")
