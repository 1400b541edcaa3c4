"""Knowledge fusion of large language models (FuseLLM) as a batch system.

Several source LMs with different tokenizers teach one target model through their
next-token distributions. See README.md for the pipeline and docs of each stage.
"""

__version__ = "0.1.0"
