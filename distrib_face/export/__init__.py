"""distrib_face.export"""
