"""CollegeAdvisor: fine-tune a small chat model into a college-value advisor."""

__version__ = "0.1.0"
