//! End-to-end scenarios live in `e2e/`; this library is empty.
