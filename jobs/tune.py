"""Ray job entrypoint for `bigray tune`: the same CLI, inside the job's cluster (RAY_ADDRESS is set by Ray).

    ray job submit --address http://<head>:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/tune.py -c configs/<x>.yaml [k=v ...]
"""

import sys

from bigray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["tune", *sys.argv[1:]]))
