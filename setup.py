"""Maps the repository's top-level folders onto the single ``domainclip`` namespace.

``core/`` installs as ``domainclip.core``, ``domains/`` as ``domainclip.domains`` and the data
folders ``recipes/`` and ``model_cards/`` as ``domainclip.recipes`` / ``domainclip.model_cards``,
so nothing called ``core`` or ``domains`` lands at the top level of site-packages.
"""
from setuptools import find_namespace_packages, setup

FOLDERS = {"core": "domainclip.core", "domains": "domainclip.domains",
           "recipes": "domainclip.recipes", "model_cards": "domainclip.model_cards"}

packages, package_dir = [], {}
for folder, name in FOLDERS.items():
    package_dir[name] = folder
    packages.append(name)
    for sub in find_namespace_packages(folder, exclude=["*__pycache__*"]):
        packages.append(f"{name}.{sub}")
        package_dir[f"{name}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"": ["*.json", "*.yaml", "*.md", "*.safetensors", "*.txt", "*.csv", "*.jpg", "NOTICE"]},
    include_package_data=True,
)
