"""h1r_ops.train"""
