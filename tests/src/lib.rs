//! Weft's end-to-end tests live in `tests/tests/`: each starts the real `weft` process on
//! 127.0.0.1:0 and talks to it over HTTP, with stock clients where the issue asks for them.
//! Guest test programs for the plugin runtime live under `tests/guests/`.
