"""The data pipeline, one stage a module, in the order the data flows:

    home.py       the cache's root: $LSTMLM_HOME, else ~/.cache/lstmlm
    download.py   known corpora (name → URL, SHA-1), downloaded into the cache, checked, unzipped
    transfer.py   one HTTP body into a file across attempts: resumed with Range, bounded
    files.py      which files a corpus is: a file, a directory's, a glob's, or a known name's
    text.py       reading files as UTF-8, the normalizations (d2l, raw, bytes), a file's summary
    encode.py     a corpus cut into pieces, each scanned and encoded on its own (a worker's job)
    workers.py    those jobs run on every core, in order, with progress per stage
    storefile.py  a token store's file: header, checksums, opened through a memory map and checked
    store.py      making a corpus's token store: scan, vocabulary, encode, the fallbacks
    cache.py      where the stores live, keyed by content, and the index from files to content
    pipeline.py   config → token store → the first max_tokens → train/validation (/test) split
    batches.py    ids → (X, Y) minibatches: the seed's sequential and random iterators

`home`, `download`, `files` and `text` import no torch, so commands that only read files start
quickly.
"""
