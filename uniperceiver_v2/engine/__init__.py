"""Training engine: MT-AdamW (`optim`), task sampling (`sampling`), lr schedule (`schedule`), checkpoints
(`checkpoint`), torch.distributed helpers (`distributed`) and the trainer.

Import the submodule you need (e.g. `from uniperceiver_v2.engine.optim import MTAdamW`); this file imports
nothing so that `import uniperceiver_v2.engine` stays cheap.
"""
