"""tuneforge: fine-tune pretrained causal language models for your task."""

import logging
import warnings

# peft still calls a transformers method deprecated in v5; the notice is not for our users.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

# bitsandbytes logs an optional-kernel notice on import (through peft) that is noise to our users;
# real problems reach them as errors.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

__version__ = "0.1.0"
