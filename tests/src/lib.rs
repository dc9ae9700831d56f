//! Integration tests for livemount live in `tests/tests/`.
