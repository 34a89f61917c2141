"""distrib_face.eval"""
