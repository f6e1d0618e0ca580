"""The e2e fixtures (object_store, services, services_env, env, tiny, store, isolated_services) live in
tests/service_fixtures.py, a plugin loaded by tests/conftest.py, so tests/reliability shares the same
session's services."""
