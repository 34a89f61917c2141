"""distrib_face.data"""
