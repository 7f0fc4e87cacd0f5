"""h1r_ops.model"""
