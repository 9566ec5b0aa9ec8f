"""One module per `tdm-r1` command: its arguments (`register`) and a short loop over the shared modules. Nothing
outside this package imports from it."""
