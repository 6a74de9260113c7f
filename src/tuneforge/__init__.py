"""tuneforge: fine-tune pretrained causal LMs."""
__version__ = "0.1.0"
