"""The data pipeline, one stage a module, in the order the data flows:

    text.py      corpus files → one normalized string (d2l or raw)
    pipeline.py  text → vocabulary → token ids → the first max_tokens → train/validation split
    cache.py     the ids of a corpus, cached by its content's hash
    batches.py   ids → (X, Y) minibatches: the seed's sequential and random iterators

`text` imports no torch, so commands that only read files start quickly.
"""
