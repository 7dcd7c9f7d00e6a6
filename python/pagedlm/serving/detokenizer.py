"""The detokenizer and stop strings, which the offline engine shares: see pagedlm.engine.text."""
from pagedlm.engine.text import IncrementalDetokenizer, SampleText, StopStrings

__all__ = ["IncrementalDetokenizer", "StopStrings", "SampleText"]
