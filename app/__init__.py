"""Flywheel's service around the models in `ml/`, laid out by process.

- `web/`: the web process (HTTP, HTML, the REST and OpenAI-compatible APIs);
- `serving/`: the served model inside each web process (hot swap, streaming answers, Stop, annotation tasks);
- `jobs/`: the worker process and its job children (training handlers, DDP ranks, the gate, the first-start bootstrap);
- `services/`: plain database functions over a Session, shared by all of them;
- the core beside this file: settings, database, schema, auth, errors, migrations, the thread hop;
- `cli/`: `flywheel ...`, which starts the processes.

Imports run one way: cli -> web -> jobs/serving -> services -> core.
"""
