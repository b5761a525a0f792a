"""What needs two stages at once, kept above both so that no stage imports a later one: the PyTorch student run
behind the runtime's loop (reference.py), the reference every engine is compared with.

    from verify.reference import reference_pipeline
    pipe = reference_pipeline("runs/quickstart/engine")      # runtime.Pipeline, the network run by PyTorch
"""
