"""The library the jobs share: the run config and folder, errors and secrets, models and decoding, the SQL checks
and the sandbox, the model card. Nothing here imports a job (jobs/*.py) or infra/; infra/ imports only this."""
