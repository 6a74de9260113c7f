"""tuneforge: fine-tune pretrained causal language models for your task."""

import logging
import warnings

# peft still calls a transformers method deprecated in v5; the notice is not for our users.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

# bitsandbytes (imported by peft when installed) warns at import that an optional CPU kernel
# package is missing; that kernel would be fetched from a hub, which tuneforge never does.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"
