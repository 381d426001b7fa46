"""Ray job entry point for training: a thin wrapper over ``nadray train``.

    ray job submit --address http://HEAD:8265 --runtime-env-json '{"env_vars": {"RAY_AUTH_MODE": "token"}}' \
        -- python jobs/train.py --archive s3://bucket/archive --registry s3://bucket/models \
           --set train.num_workers=4 --set train.use_gpu=true

Inside a job RAY_ADDRESS is set, so the command joins the job's cluster; every
argument is passed to ``nadray train`` unchanged.
"""

from __future__ import annotations

import sys

from nadray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
