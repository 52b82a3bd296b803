"""Checks of the dynamics' predictions on real LLM fine-tuning (see issue 4)."""
