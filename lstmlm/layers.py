"""The package's layers, bottom first: a module imports only from its own layer or those below.

`tests/test_layers.py` parses every module's imports (lazy ones inside functions and those for
type checking included) and fails on one that points up this list. A module is placed by its
name under `lstmlm` (a subpackage's modules, `cells.lstm` or `cli.train`, by the subpackage,
unless the module itself is named here, as `data.home` and `data.download` are).

     1  lstmlm, errors                 the version; the exceptions
     2  atomic, device, distributed,   durable writes; the device and precision; torchrun;
        vocab, progress, fields,       the vocabulary; where a training stands; fields that
        sampling, figures              carry their option; sampling rules; figures read back
     3  data.home, data.download,      the cache's root; known corpora and downloads (an HTTP
        data.transfer, trust           body across attempts); the compiled cache's trust checks
     4  cells, fused, recurrence,      the recurrent cells and their fast paths (the fused
        native                         Python path, the compiled C++ recurrence)
     5  splits, cadences, config,      every hyperparameter (a corpus's split, a cadence typed,
        config_file, sizes             with its timing); reading configs; a model's size
     6  runs, data, resuming           the run store (no torch); files to token ids to batches;
                                       what a resume may change and what it refuses
     7  model, graphs, carry           CharLM; the step as a CUDA graph; the state between batches
     8  evaluation, baselines, events, what a trained model is and does: scores, baselines,
        generate, choosing, stepper,   reports; generation, its choice for every row, its
        units, units_page, export,     batched step; inside a model; export; checkpoints; the
        checkpoint, plot, tensorboard, plot files; TensorBoard; the default recipe; what training
        recipe, samples                samples from
     9  step, checkpointer, precision  one optimizer step and how it is built; saving and resuming;
                                       --precision auto, timed on the model to train
    10  train                          the loop
    11  training, inference            starting and resuming a training; using a trained model
    12  tune, serve, bench, runlist,   Optuna studies; the HTTP API; `lstmlm bench`; `lstmlm runs`
        runsummary                     and one run summed up from its files
    13  cli, __main__                  the command line
"""

from __future__ import annotations

# fmt: off
LAYERS: tuple[tuple[str, ...], ...] = (
    ("lstmlm", "errors"),
    ("atomic", "device", "distributed", "vocab", "progress", "fields", "sampling", "figures"),
    ("data.home", "data.download", "data.transfer", "trust"),
    ("cells", "fused", "recurrence", "native"),
    ("splits", "cadences", "config", "config_file", "sizes"),
    ("runs", "data", "resuming"),
    ("model", "graphs", "carry"),
    ("evaluation", "baselines", "events", "generate", "choosing", "stepper", "units",
      "units_page", "export", "checkpoint", "plot", "tensorboard", "recipe", "samples"),
    ("step", "checkpointer", "precision"),
    ("train",),
    ("training", "inference"),
    ("tune", "serve", "bench", "runlist", "runsummary"),
    ("cli", "__main__"),
)
# fmt: on
"""The layers above, bottom first, each a tuple of module (or subpackage) names under `lstmlm`."""

# "layers" itself sits nowhere: nothing imports it but the test that checks the others by it.
