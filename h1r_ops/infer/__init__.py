"""h1r_ops.infer"""
