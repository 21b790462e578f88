"""unigap pipelines: the pure core of the self-improvement loop (no Ray imports here).

Where it fits: `config` (one typed config tree), `schemas` (row contracts checked at every stage
boundary), `store` (run directory + manifest on any pyarrow filesystem), `prompts` (prompt
sources), `pools` (accepted / rejected / uncertain, SFT sets, DPO pairs, Nonunified score),
`review` (human review export and label import), `stats` (Wilson intervals). Ray glue lives in
other modules and only calls these.

Example:
    >>> from pipelines.config import load_config
    >>> load_config(None, ["run.rounds=1"]).run.rounds
    1
"""
