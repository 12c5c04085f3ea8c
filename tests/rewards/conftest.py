from tests.data.conftest import tiny_model_dir  # noqa: F401  (the session's tiny checkpoint fixture)
