"""Real servers on loopback for the tests and the benchmarks: sshd, moto, SeaweedFS, PostgreSQL,
Prefect. Each starts on 127.0.0.1 on a free port and is stopped by its PID."""
