"""CollegeAdvisor: fine-tune a small chat model into a college-value advisor."""

__version__ = "0.1.0"

import warnings as _warnings

# peft 0.21 reads `model.is_gradient_checkpointing`, which transformers 5 deprecates with a FutureWarning on every
# get_peft_model / PeftModel.from_pretrained: noise a user cannot act on.
_warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
