from nitrovault.cli import main

main()
