"""The worker process and the child processes it runs a job in: what each job does, DDP ranks, the promotion gate and
the first-start bootstrap."""
