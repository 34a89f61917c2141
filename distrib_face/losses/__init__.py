"""distrib_face.losses"""
