r"""Ray job entrypoint for `bigray serve`: the same CLI, inside the job's cluster (RAY_ADDRESS is set by Ray).

    ray job submit --address http://<head>:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/serve.py -c configs/<x>.yaml \
        serve.model=s3://<bucket>/runs/<run>/export serve.host=0.0.0.0
"""

import sys

from bigray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["serve", *sys.argv[1:]]))
