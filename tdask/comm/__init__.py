"""The request stream: its protocol, tdask's own socket (a Dask comm backend), and the caller's side of it."""
