"""The demo corpus (tiny_corpus.txt), shipped as package data: run.py --tiny trains its tokenizer from it."""
