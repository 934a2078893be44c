"""The stages of the pass, one module per arrow of design.md §2. A stage imports core and
the data types of earlier stages only; the pipeline chains them."""
