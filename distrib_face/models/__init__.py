"""distrib_face.models"""
