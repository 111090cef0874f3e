//! Deployment checks: tests that hold `docker-compose.yml` and `deploy/terraform` against
//! the settings each service really reads. The tests live in `tests/`.
