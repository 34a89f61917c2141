"""distrib_face.parallel"""
