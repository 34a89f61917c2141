"""distrib_face.tracking"""
