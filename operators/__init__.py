"""The hello world's operators: Triton Core models and a Python operator. Installed, they are ``tdask.hello_world``."""
