"""growlm: grow small pretrained decoder LMs into larger ones, train on, compare with scratch."""

__version__ = "0.1.0"
