from moeplace.cli import entry

entry()
