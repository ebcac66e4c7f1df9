"""The built-in models.toml, kept at the repository's top level, ships inside the package.

Everything else about the build is in pyproject.toml; setuptools' package-data only takes files
inside a package folder, so the wheel's ``localmed/models.toml`` is copied here. An editable
install reads the file at the source tree's root (``localmed.registry.builtin_registry_path``).
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithRegistry(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:  # read where it is, at the source tree's root
            return
        target = Path(self.build_lib) / "localmed"
        self.mkpath(str(target))
        self.copy_file(str(Path(__file__).with_name("models.toml")), str(target / "models.toml"))


setup(cmdclass={"build_py": BuildWithRegistry})
