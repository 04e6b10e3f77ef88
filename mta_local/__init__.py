"""mta-local: Merge-then-Adapt personalization of local LLMs."""

__version__ = "0.1.0"
