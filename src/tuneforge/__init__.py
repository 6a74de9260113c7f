"""tuneforge: fine-tune pretrained causal language models for your task."""

import warnings

# peft still calls a transformers method deprecated in v5; the notice is not for our users.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

__version__ = "0.1.0"
