"""Running a fusion run on Kubernetes: the Helm chart's values, the controller that creates
each stage's workload once its inputs are committed, and the `helm test` check.

    values.py       the chart's values: a run spec plus cluster keys; generates values.schema.json
    controller.py   the controller Job's loop (store -> Kubernetes API)
    check.py        what `helm test` runs: the spec parses and the store is reachable
"""
