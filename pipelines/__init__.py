"""unigap pipelines: the self-improvement loop, from config to report.

Where it fits: a pure core that imports no Ray — `config` (one typed config tree), `schemas` (row
contracts checked at every stage boundary), `store` (run directory + manifest on any pyarrow
filesystem), `prompts` (prompt sources), `pools` (accepted / rejected / uncertain, SFT sets, DPO
pairs, Nonunified score), `review` (human review export and label import), `stats` (Wilson
intervals, paired bootstrap), `evaluate` (evaluation rows and metrics), `audit` (external judges,
promote / roll back), `report`, `compare` — and the Ray glue that calls it: `stages` (Ray Data
generate / judge), `rounds` + `improve` (the stage bodies of a round), `driver` (the resumable
loop), `tracking` (W&B), `cli`.

Example:
    >>> from pipelines.config import load_config
    >>> load_config(None, ["run.rounds=1"]).run.rounds
    1
"""
