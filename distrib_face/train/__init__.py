"""distrib_face.train"""
