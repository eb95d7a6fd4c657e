"""What every stage shares and none of them owns: the error family, the log line, loading a Hugging Face model or
tokenizer by name or path (with the offline check), padding token ids into a batch, the config framework (options in
groups, spelled flat as flags and YAML keys) and where rows come from (``DataSource``: files, the hub, or the seeded
synthetic problems).

It sits at the bottom of the import order: it imports nothing else of KaVa, and every other package may import it.
torch, transformers and huggingface_hub are imported inside the functions that need them, so importing
``kava.core`` stays cheap.
"""
